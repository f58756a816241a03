package hsm

// SelfTestVector exposes the self-test constants to the external tests.
func SelfTestVector() (key, iv, dek, wrapped []byte) { return katKEK, katIV, katDEK, katWrapped }
