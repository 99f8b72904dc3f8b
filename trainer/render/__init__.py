"""Pictures in and out, with Pillow: reference photos -> an IMAGE batch (:mod:`.images`), the
training report's line charts (:mod:`.plot`), labelled grids and metrics tables (:mod:`.grid`)."""
