package hsm

// SelfTestVector exposes the self-test constants to the external tests.
func SelfTestVector() (key, iv, dek, wrapped []byte) { return katKEK, katIV, katDEK, katWrapped }

// SoftKWP exposes the RFC 5649 reference to the external tests.
func SoftKWP(kek, pt []byte) []byte { return softKWP(kek, pt) }
