"""The pure core: plan vocabulary with no storage library, no format and no process (imported by every layer)."""
