"""moeflow: run Mixture-of-Experts models with most experts off the fast device, exactly."""
