"""expertplane.kernels"""
