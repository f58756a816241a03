package hsm

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/kms"
)

// Known answer for the wrap path: AES-256-GCM with this key, IV and AAD turns
// kat DEK into katWrapped. The constants were computed with Go's crypto/aes
// and crypto/cipher; TestSelfTestVectorMatchesSoftware recomputes them.
var (
	katKEK, _     = hex.DecodeString("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	katIV, _      = hex.DecodeString("cafebabefacedbaddecaf888")
	katAAD        = []byte("kmsd hsm self-test")
	katDEK, _     = hex.DecodeString("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72")
	katWrapped, _ = hex.DecodeString("5392920352fe49fee3525418d4e8afa58b876902ca2d9dae6093344c34b8ef8db65171f9960b5a001bc21a38f6b732ee")
)

// selfTest checks the wrap path two ways before the sealer is used:
//  1. known answer: the token's AES-GCM, keyed with a known session key,
//     produces the known ciphertext and decrypts it back;
//  2. round trip: a blob sealed under the real KEK opens, and fails to open
//     under another context.
func (s *Sealer) selfTest() error {
	ctx := context.Background()
	err := s.run(ctx, func(sh pkcs11.SessionHandle, _ pkcs11.ObjectHandle) error {
		key, err := s.mod.CreateObject(sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, katKEK),
		})
		if err != nil {
			return fmt.Errorf("create the known-answer key: %w", err)
		}
		defer s.mod.DestroyObject(sh, key)
		ct, err := s.hsmEncrypt(sh, key, katIV, katAAD, katDEK)
		if err != nil {
			return err
		}
		if !bytes.Equal(ct, katWrapped) {
			return fmt.Errorf("AES-GCM encryption gave a wrong answer")
		}
		pt, err := s.hsmDecrypt(sh, key, katIV, katAAD, ct)
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, katDEK) {
			return fmt.Errorf("AES-GCM decryption gave a wrong answer")
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSelfTest, err)
	}
	sc := kms.SealContext{Key: "self-test", Version: 1, Kind: "self-test"}
	want := []byte("kmsd self-test material")
	b, err := s.Seal(ctx, sc, kms.NewSecret(bytes.Clone(want)))
	if err != nil {
		return fmt.Errorf("%w: seal: %v", ErrSelfTest, err)
	}
	got, err := s.Unseal(ctx, sc, b)
	if err != nil || !bytes.Equal(got.Reveal(), want) {
		return fmt.Errorf("%w: a sealed blob did not open: %v", ErrSelfTest, err)
	}
	sc.Version = 2
	if _, err := s.Unseal(ctx, sc, b); err == nil {
		return fmt.Errorf("%w: a blob opened under the wrong context", ErrSelfTest)
	}
	return nil
}
