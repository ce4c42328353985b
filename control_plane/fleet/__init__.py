"""What the fleet tells the control plane (SPEC §12): node reports and what they add up to (pure logic)."""
