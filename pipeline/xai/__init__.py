"""Explanations: Captum attribution methods and the measurements of how far each deserves trust."""
