"""nasfcos.data"""
