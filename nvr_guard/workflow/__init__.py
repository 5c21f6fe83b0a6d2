"""Export workflow: requests, approvals and the export job that carries footage out."""
