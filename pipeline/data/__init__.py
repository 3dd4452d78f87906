"""What a user holds, as validated, pseudonymised images: one reader per source, preprocessing,
the phantom generator, patient-grouped splits, privacy, and the imbalance strategies."""
