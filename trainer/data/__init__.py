"""The data path, stage by stage: source -> join -> text/images -> collate -> loader."""
