"""The samlab dashboard's helpers: shared Streamlit pieces (`common`), plotly builders (`figures`),
config widgets (`forms`) and table / legend builders (`tables`). The core `samlab` never imports this."""
