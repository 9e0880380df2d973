"""vlforge.tune"""
