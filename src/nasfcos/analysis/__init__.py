"""nasfcos.analysis"""
