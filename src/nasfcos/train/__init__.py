"""nasfcos.train"""
