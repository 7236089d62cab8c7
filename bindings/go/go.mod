module kvplug.dev/kvplug

go 1.19
