"""Data, task streams, teachers and other pure state machines."""
