"""Sites: the places images live (Glance clouds, directory stores, VOSpace), behind one protocol."""
