"""lmforge.retrieval"""
