"""kinema.io"""
