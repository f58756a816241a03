package he

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/utils/sampling"
)

// uniformPRNG is the source of the uniform "a" halves of the public and
// evaluation keys: AES-256 in counter mode under a fresh key from
// crypto/rand, the construction of NIST SP 800-90A's CTR_DRBG without its
// reseeding (one key encrypts at most a few GiB of keystream here, far
// below AES's limits).
//
// Lattigo's default is a BLAKE2b XOF, which costs about half of all key
// generation time; AES-CTR runs on AES-NI at several GiB/s. The uniform
// polynomials are public (they are part of every key) and need only to be
// pseudo-random and independent of the secret, which a CSPRNG keyed from
// the OS gives. The error terms and the secret keep their own samplers:
// the errors Lattigo's keyed BLAKE2b PRNG from crypto/rand, the secret the
// seed-keyed PRNG in SecretKey.
type uniformPRNG struct {
	stream cipher.Stream
}

func newUniformPRNG() (*uniformPRNG, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	return uniformPRNGFromKey(key)
}

func uniformPRNGFromKey(key []byte) (*uniformPRNG, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return &uniformPRNG{stream: cipher.NewCTR(block, make([]byte, aes.BlockSize))}, nil
}

// Read fills p with keystream (CTR over zeros).
func (r *uniformPRNG) Read(p []byte) (int, error) {
	clear(p)
	r.stream.XORKeyStream(p, p)
	return len(p), nil
}

// newKeyGenerator is Lattigo's key generator with the uniform sampler
// drawing from prng. Not safe for concurrent use.
func newKeyGenerator(p rlwe.ParameterProvider, prng sampling.PRNG) *rlwe.KeyGenerator {
	kgen := rlwe.NewKeyGenerator(p)
	kgen.Encryptor = kgen.WithPRNG(prng)
	return kgen
}
