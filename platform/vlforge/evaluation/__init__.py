"""vlforge.evaluation"""
