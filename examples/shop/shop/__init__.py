"""The example shop: orders, payments, inventory, shipping, email and analytics (see ../meshkit.toml)."""
