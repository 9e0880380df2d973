"""vlforge.tracking"""
