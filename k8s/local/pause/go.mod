module medcritical.local/pause

go 1.22
