"""Dashboard screens: welcome (empty database), runs, transfer matrix, help."""
