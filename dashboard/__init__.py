"""The samlab dashboard's helpers: shared Streamlit pieces (`common`), plotly builders (`figures`),
config widgets (`forms`), table / legend builders (`tables`), and `plots`, which draws stored runs
and analyses with the builders for the pages and notebooks alike. The core `samlab` never imports this."""
