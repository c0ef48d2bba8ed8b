"""expertplane.controller"""
