"""lmforge.export"""
