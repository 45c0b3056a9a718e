"""kinema.eval"""
