"""kinema.serve"""
