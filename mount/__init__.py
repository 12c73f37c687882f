"""shadowblk.mount"""
