"""shadowblk.provider"""
