// Package s3conn connects to an S3-compatible server, the one way kmsd
// does for every bucket it uses (HE blobs, the audit archive): AWS
// Signature V4 with static credentials, path-style buckets, TLS 1.2 or
// later, a minute's bound on a response's headers.
package s3conn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Config is a server and the credentials to sign with.
type Config struct {
	Endpoint string // https://host[:port], or http:// to loopback (the caller checks)
	Region   string // default "us-east-1"
	// AccessKeyID and SecretAccessKey sign requests; SessionToken is for
	// temporary credentials.
	AccessKeyID, SecretAccessKey, SessionToken string
	RootCAs                                    *x509.CertPool // nil: the system's
}

// Open connects and checks that bucket exists (kmsd creates none).
func Open(ctx context.Context, cfg Config, bucket string) (*minio.Client, error) {
	u, err := url.Parse(cfg.Endpoint)
	if err != nil || u.Host == "" {
		return nil, errors.New("the endpoint is not a URL")
	}
	if cfg.AccessKeyID == "" || cfg.SecretAccessKey == "" {
		return nil, errors.New("credentials are required (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: cfg.RootCAs}
	tr.ResponseHeaderTimeout = time.Minute
	c, err := minio.New(u.Host, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken),
		Secure:       u.Scheme == "https",
		Region:       cfg.Region,
		BucketLookup: minio.BucketLookupPath,
		Transport:    tr,
	})
	if err != nil {
		return nil, err
	}
	ok, err := c.BucketExists(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("bucket %q: %w", bucket, err)
	}
	if !ok {
		return nil, fmt.Errorf("bucket %q does not exist (kmsd does not create it)", bucket)
	}
	return c, nil
}

// NotFound reports whether err is the server saying there is no such
// object.
func NotFound(err error) bool {
	code := minio.ToErrorResponse(err).Code
	return code == minio.NoSuchKey || code == "NotFound"
}
