"""Reading files: the bottom layer (imports nothing of krea2_lite above `errors`)."""
