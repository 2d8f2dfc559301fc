"""Demo: synthetic CT study, an embedded pynetdicom PACS and a cloud store SCP."""
