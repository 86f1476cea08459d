"""The intervention engine: knockouts, patches, captures and attention statistics on stock transformers."""
