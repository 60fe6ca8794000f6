"""The paper's pose route: HRNet-W32 2D keypoints -> VideoPose3D lifter (backend
``hrnet-videopose3d``), and the lifter's training on infant motion seen through random cameras.
"""
