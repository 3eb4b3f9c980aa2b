"""lmforge.report"""
