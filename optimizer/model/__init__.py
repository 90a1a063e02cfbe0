"""What the model is and which files serve it: intake, precision variants, accuracy, providers, examples."""
