"""vlforge.data"""
