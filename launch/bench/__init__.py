"""Every ``pd bench`` benchmark, one module each (serve, gpu, ttft, soak, store, transport,
infinistore, kv); see docs/ for their figures."""
