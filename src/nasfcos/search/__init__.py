"""nasfcos.search"""
