"""What a round does with the data: teachers, selection, auto-accept, Defect-Click, augmentation."""
