"""nasfcos.nn"""
