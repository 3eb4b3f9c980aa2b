"""lmforge.core"""
