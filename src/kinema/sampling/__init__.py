"""kinema.sampling"""
