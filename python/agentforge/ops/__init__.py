from agentforge.ops._load import cpu_info, extension_loaded
