"""vlforge.train"""
