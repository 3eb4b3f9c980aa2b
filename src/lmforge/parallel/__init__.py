"""lmforge.parallel"""
