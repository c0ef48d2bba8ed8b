"""expertplane.agent"""
