"""Clear machine learning: MedMNIST and uploaded images to a trained, saved model."""
