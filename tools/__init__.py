"""shadowblk.tools"""
