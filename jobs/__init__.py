"""Thin entry points: the extemb CLI, Make targets and Ray jobs. No logic lives here."""
